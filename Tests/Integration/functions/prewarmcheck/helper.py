"""A sibling module of main.py: importing it proves the instance sees its own code folder."""

MARKER = "helper-from-the-code-folder"
