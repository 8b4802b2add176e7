"""Stream consumers: the generic runner, the command handler and the paper venue."""
