"""Development files: the task list from which the manifest is generated."""
