"""The provider executor: batch items run inside a provider's own batch API (issue #13).

`executor = "workers"` is the batch channel as it always was (Celery workers call the
provider per item). `executor = "provider"` hands the items to OpenAI's Batches API,
Anthropic's Message Batches or the mock's, at the batch price: batch-queue tasks, which
the sweeper enqueues, submit them (split by the provider's limits), poll each provider
batch with backoff from its stored id, and write every result into the same item rows,
exactly once, as a worker would.

- `choice.resolve`: which executor a routed batch gets, and why (on the route).
- `apis`: one adapter per provider's batch API, through the official SDKs.
- `engine`: submit, poll, apply results, cancel and expire; `sweep` is the sweeper
  step (it only enqueues); workers/batch_tasks.py runs the rest.

Import the modules themselves: the batch engine imports `choice`, and `engine` imports it.
"""
