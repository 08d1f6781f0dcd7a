"""Everything about the sipp being run: its argument tables, its scenarios, the runner."""
