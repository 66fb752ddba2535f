"""Every file the package reads or writes goes through here (``paths.py`` for plain files,
``safetensors.py`` for weights), so an OS or format error becomes one
:class:`~moelora_dist.errors.FileError` line naming the path and the real cause."""
