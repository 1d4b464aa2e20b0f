"""kvferry router package."""
