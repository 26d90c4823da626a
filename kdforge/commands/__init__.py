"""Sub-commands of the ``kdforge`` CLI (one module each: ``add_parser``, ``run``)."""
