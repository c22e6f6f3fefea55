"""Fakes for the seams the core depends on (issue 10, item 6): the engine behind the
`Engine` contract, Serve's pool handles over real `PoolReplica`s, and an in-process
gateway (the real core and FastAPI app over them, on a real redis-server)."""
