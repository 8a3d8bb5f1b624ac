"""Every use of Flower's non-public internals (flwr 1.39), in one package.

Why: fedfsd stays on flwr 1.39 (its Fleet API is gRPC; 1.40 moved it to HTTP), and it needs a
few things Flower does not publish: its own long-lived region executor, faster polling, a
bounded message pull and the `flwr` CLI's FAB builder. Keeping each such import here means a
Flower upgrade touches one package, and tests/test_flower_internals_scan.py fails when any
other module imports a private flwr module.

What counts as public (read from the installed flwr 1.39 package, not from newer docs):
- the packages `flwr/__init__.py` exports: `flwr.app`, `flwr.clientapp`, `flwr.serverapp`,
  `flwr.agentapp` (its `__all__`) and the legacy `flwr.client`, `flwr.server`, `flwr.common`,
  `flwr.simulation` it re-exports;
- inside a public package, only the names in its `__init__`'s `__all__` (so
  `flwr.serverapp.strategy.FedAvg` and `flwr.app.Error` are public; `flwr.app.error`,
  `flwr.common.serde` and `flwr.common.constant` are not, being modules no `__all__` lists);
- everything else is non-public: `flwr.supercore`, `flwr.supernode`, `flwr.superlink`,
  `flwr.proto`, `flwr.cli` (the `flwr` command is public, its Python modules are not).

Modules (each wraps one area):
- `pull_backoff`: 50 ms object-pull retries at the SuperNode, executor and ServerApp.
- `supernode_poll`: the SuperNode's 3 s idle poll capped; the stock `flower-supernode` entry.
- `patches`: the list of run-time patches above and a check that each is in effect.
- `runtime_api`: the SuperNode Runtime API client the region executor serves tasks with.
- `bounded_pull`: pulling a message's objects under the region's byte bound.
- `message_objects`: Flower's object tree, object store and task identity (studies, tests).
- `flwr_cli`: the `flwr` command's FAB builder, node-key loader and typer app.
- `node_refusals`: refused SuperNode keys (Fleet API activation) to the aggregator's
  security log, applied by `superlink_launcher` in the SuperLink process.
"""
