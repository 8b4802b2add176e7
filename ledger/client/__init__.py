"""The client side: publishing commands, read-only queries of live state and history, the public
models, ``PositionManager`` / ``OrderManager``."""
