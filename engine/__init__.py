"""kvferry engine package."""
