"""Subcommands of the ``privimage`` command line, one module each (see ``privimage.cli``)."""
