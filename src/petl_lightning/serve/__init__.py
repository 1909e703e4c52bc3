"""Serving many tasks from one frozen backbone: ``petl-lightning serve`` on LitServe (the ``[serve]`` extra)."""
