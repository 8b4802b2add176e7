"""The event log's edge: the Redis event store and its Lua, keys, the hash chain, the operations
stream and the reader over both tiers (Redis, then the PostgreSQL archive)."""
