"""The two pluggy markers, created once. Import them as ``from tunesmith import hookimpl``."""

import pluggy

PROJECT = "tunesmith"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
