"""The pure domain: values, vocabulary, state, the decider and evolution, the transition table and
the one mapping per aggregate. Imports nothing of Redis, PostgreSQL, asyncio or ccxt."""
