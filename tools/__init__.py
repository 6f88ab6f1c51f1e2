"""lmforge.tools: the commands. Heavy libraries are imported inside commands, never here."""
