"""The ``fedretrain`` command: the process edge that dispatches to every role."""
