"""kvferry cluster package."""
