"""One module per pipeline stage, each with ``run(config, force=False)`` (irn's structure), each
declaring itself with ``STAGE = register_stage(Stage(...))``. What several stages share is in
:mod:`.common`; a stage never imports another."""
