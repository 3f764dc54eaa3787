"""One module per public dataset family, each owning its files, columns, the owners' sources it follows, its
gaze reader where it has gaze, its ``egma-prepare`` subcommands (``COMMANDS``) and its fake tree for tests and
demos (``write_fake_tree``); ``registry`` lists them, ``_common`` holds what they share and ``_fakes`` what
their fake trees share. ``egma_model.prepare`` is the command line over them.

Nothing is imported here, so that a reader (``egma_model.data`` reads gaze through ``reflacx``, ``egd_cxr``,
``mimic_eye``) does not load every dataset.
"""
