"""The SurgUn tab in AUTOMATIC1111 / Forge: A1111 executes every .py in scripts/ at start-up.

The extension folder is put on sys.path (appended: the host's own modules win any name clash) so the tab
imports surgun_core and surgun_ui from it; the UI is built only when A1111 builds its tabs.
"""

import os
import sys

from modules import script_callbacks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)


def on_ui_tabs():
    from surgun_ui.app import build_ui
    from surgun_ui.webui import WebuiHost

    return [(build_ui(WebuiHost()), "SurgUn", "surgun")]


script_callbacks.on_ui_tabs(on_ui_tabs)
