"""SurgUn's form front ends: one gradio UI (app.py) for the A1111/Forge tab (webui.py) and `surgun ui`.

Only app.py imports gradio, and only when a UI is built; the hosts import nothing of A1111 until used.
"""
