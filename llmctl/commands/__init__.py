"""What each subcommand does, as plain functions: wiring of config, data, model, loop, checkpoint, generation.

One module a command group (training, inference, serving, evaluation, preparation, interop, compression, and
decode_step, the work after training that the inference side owns); the CLI imports each where it is used, so
`llmctl prepare` and `llmctl config` start without torch. They return results (dicts, iterators of text) and
report through the one `Events` they are given (`llmctl.events`; silent by default); the CLI decides how it looks.
Every expected failure is an `LlmctlError`, raised before work starts where possible.
"""
