"""Command-line entry points: chat, and the data checker and inspector behind tools/check_data.py and
tools/inspect_data.py."""
