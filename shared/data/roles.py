"""The roles of aligned messages: a module of its own so that what only needs the names (the
templates, and the completion scripts through them) does not load pyarrow."""

USER, ASSISTANT, TOOL = "user", "assistant", "tool"
ROLES = (USER, ASSISTANT, TOOL)
# version 1's roles (read when upgrading, and accepted from legacy (role, content) pairs)
FUNCTION, OBSERVATION = "function_call", "observation"
