"""The stream channel's delta log: a Redis Stream per job, written by workers, relayed by web.

- `keys`: every Redis key and channel name;
- `entries`: the entry format (the one writer and reader of an entry) and `Generation`;
- `writer`: the worker's `DeltaLog` and the process's shared `AppendBatcher`;
- `hub`: the web's one pub/sub connection per process (`StreamHub`) and a relay's `Tail`;
- `render`: entries -> OpenAI `chat.completion.chunk` events;
- `relay`: a Tail as an SSE body, or collected into one result (stream:false).
"""
