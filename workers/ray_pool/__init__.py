"""Ray code, and only Ray code: the actor pool (``actors``), the engine on it (``engine``) and data-parallel
drafter training across it (``training``). It uses the rest of ``workers`` and ``specdit`` through their
public names only; nothing outside this package imports Ray."""
