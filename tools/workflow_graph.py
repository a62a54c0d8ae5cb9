"""Litegraph workflow graphs for tools/make_workflows.py: nodes, links, widget order from /object_info, layout.

widgets_values is positional, so its order comes from a running server's /object_info: input_order
(required, then optional), and after an INT widget with control_after_generate (explicit, or by default a
widget named seed / noise_seed) the front end's extra "control after generate" value.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the front end adds "control after generate" to these unless told not to
# Widgets the front end adds by itself (not in /object_info), serialized after the node's own: PreviewAny's
# read-only markdown and text previews (not serialized: null) and its Markdown/Plaintext toggle.
FRONT_END_WIDGETS = {"PreviewAny": [None, None, False]}
NOTE_TYPES = {"MarkdownNote", "Note"}  # front-end-only nodes: not in /object_info, never sent to the server


@dataclass
class Node:
    id: int
    type: str
    inputs: dict  # input name -> literal widget value, or (Node, output slot) for a link
    title: str | None = None
    links_out: dict = field(default_factory=dict)  # output slot -> [link ids]

    def __getitem__(self, slot: int) -> tuple[Node, int]:
        return (self, slot)


class Graph:
    """A workflow under construction: nodes in insertion order; serialised to UI or API format."""

    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[Node] = []

    def add(self, type_: str, title: str | None = None, **inputs) -> Node:
        if type_ not in self.info and type_ not in NOTE_TYPES:
            raise KeyError(f"{type_} is not in this server's /object_info: is the pack (or ComfyUI) up to date?")
        node = Node(len(self.nodes) + 1, type_, inputs, title)
        self.nodes.append(node)
        return node

    def note(self, text: str, title: str) -> Node:
        return self.add("MarkdownNote", title=title, text=text)

    # -- API format (POST /prompt) -------------------------------------------------------------------------
    def to_api(self) -> dict:
        prompt = {}
        for n in self.nodes:
            if n.type in NOTE_TYPES:
                continue
            ins = {k: [str(v[0].id), v[1]] if _is_link(v) else v for k, v in n.inputs.items()}
            prompt[str(n.id)] = {"class_type": n.type, "inputs": ins}
        return prompt

    # -- UI format (what the front end saves) ----------------------------------------------------------------
    def to_ui(self, allow_missing: tuple[str, ...] = ()) -> dict:
        links, ui_nodes = [], {}
        for n in self.nodes:
            ui_nodes[n.id] = self._ui_node(n, allow_missing)
        for n in self.nodes:  # links, numbered in node order
            for slot, (_name, value) in enumerate(self._socket_inputs(n)):
                if not _is_link(value):
                    continue
                src, src_slot = value
                link_id = len(links) + 1
                out_type = self._spec(src.type)["output"][src_slot]
                links.append([link_id, src.id, src_slot, n.id, slot, out_type])
                ui_nodes[n.id]["inputs"][slot]["link"] = link_id
                outs = ui_nodes[src.id]["outputs"][src_slot]
                outs["links"] = [*(outs["links"] or []), link_id]
        pos, size = _layout(self.nodes, ui_nodes)
        for order, n in enumerate(_topological(self.nodes)):
            ui_nodes[n.id].update(order=order)
        for n in self.nodes:
            ui_nodes[n.id]["pos"], ui_nodes[n.id]["size"] = pos[n.id], size[n.id]
        return {
            "id": str(uuid.uuid4()),
            "revision": 0,
            "last_node_id": max(ui_nodes),
            "last_link_id": len(links),
            "nodes": [_ordered_node(ui_nodes[n.id]) for n in self.nodes],
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}, "frontendVersion": self.info["_frontend_version"]},
            "version": 0.4,
        }

    def _spec(self, type_: str) -> dict:
        return self.info[type_]

    def _ordered_inputs(self, type_: str) -> list[tuple[str, list, bool]]:
        """(name, spec, optional) in the front end's order: input_order's required, then optional."""
        spec = self._spec(type_)
        order = spec.get("input_order") or {k: list(spec["input"].get(k, {})) for k in ("required", "optional")}
        return [(name, spec["input"][part][name], part == "optional")
                for part in ("required", "optional") for name in order.get(part, [])]  # fmt: skip

    def _socket_inputs(self, n: Node) -> list[tuple[str, object]]:
        if n.type in NOTE_TYPES:
            return []
        return [(name, n.inputs.get(name)) for name, spec, _ in self._ordered_inputs(n.type) if not _is_widget(spec)]

    def _ui_node(self, n: Node, allow_missing: tuple[str, ...]) -> dict:
        if n.type in NOTE_TYPES:
            return {"id": n.id, "type": n.type, "flags": {}, "mode": 0, "inputs": [], "outputs": [],
                    "title": n.title, "properties": {}, "widgets_values": [n.inputs["text"]],
                    "color": "#432", "bgcolor": "#653"}  # fmt: skip
        spec = self._spec(n.type)
        known = {name for name, _, _ in self._ordered_inputs(n.type)}
        if unknown := set(n.inputs) - known:
            raise KeyError(f"{n.type} has no input {sorted(unknown)}; it has {sorted(known)}")
        inputs, widget_inputs, widgets, multiline = [], [], [], 0
        for name, ispec, optional in self._ordered_inputs(n.type):
            value = n.inputs.get(name)
            shape = {"shape": 7} if optional else {}  # 7: the hollow socket of an optional input
            if not _is_widget(ispec):
                if value is None and not optional:
                    raise ValueError(f"{n.type}.{name} is a required socket and is not connected")
                inputs.append({"localized_name": name, "name": name, **shape, "type": ispec[0], "link": None})
                continue
            # the front end gives every widget a socket too, after the plain sockets; unlinked here
            type_ = "COMBO" if isinstance(ispec[0], list) else ispec[0]
            widget_inputs.append({"localized_name": name, "name": name, **shape, "type": type_,
                                  "widget": {"name": name}, "link": None})  # fmt: skip
            if _is_link(value):
                raise ValueError(f"{n.type}.{name}: links into widgets are not supported by this generator")
            opts = ispec[1] if len(ispec) > 1 else {}
            if name not in n.inputs:
                value = n.inputs[name] = _default(ispec)
            _check(n.type, name, ispec, value, allow_missing)
            widgets.append(value)
            multiline += bool(opts.get("multiline"))
            if ispec[0] == "INT" and opts.get("control_after_generate", name in SEED_NAMES):
                widgets.append("fixed")  # examples should reproduce: not the front end's default "randomize"
        inputs += widget_inputs
        widgets += FRONT_END_WIDGETS.get(n.type, [])
        outputs = [{"localized_name": name, "name": name, "type": type_, "links": None}
                   for name, type_ in zip(spec["output_name"], spec["output"])]  # fmt: skip
        props = {"Node name for S&R": n.type}
        if not spec["python_module"].startswith("custom_nodes"):
            props.update(cnr_id="comfy-core", ver=self.info["_comfyui_version"])
        node = {"id": n.id, "type": n.type, "flags": {}, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": props, "widgets_values": widgets, "_multiline": multiline}  # fmt: skip
        if n.title:
            node["title"] = n.title
        return node


def _is_link(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Node)


def _is_widget(ispec: list) -> bool:
    force_input = len(ispec) > 1 and ispec[1].get("forceInput")
    return isinstance(ispec[0], list) or (ispec[0] in WIDGET_TYPES and not force_input)


def _combo_options(ispec: list) -> list:
    return ispec[0] if isinstance(ispec[0], list) else ispec[1].get("options", [])


def _default(ispec: list):
    opts = ispec[1] if len(ispec) > 1 else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(ispec[0], list) or ispec[0] == "COMBO":
        return (_combo_options(ispec) or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[ispec[0]]


def _check(type_: str, name: str, ispec: list, value, allow_missing: tuple[str, ...]) -> None:
    """Refuse a value the server would refuse (files named in allow_missing may be absent here)."""
    opts = ispec[1] if len(ispec) > 1 else {}
    if isinstance(ispec[0], list) or ispec[0] == "COMBO":
        if value not in _combo_options(ispec) and name not in allow_missing:
            raise ValueError(f"{type_}.{name} = {value!r} is not one of {_combo_options(ispec)}")
    elif ispec[0] in ("INT", "FLOAT") and not opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")):
        raise ValueError(f"{type_}.{name} = {value!r} is outside [{opts.get('min')}, {opts.get('max')}]")


def _topological(nodes: list[Node]) -> list[Node]:
    deps = {n.id: {v[0].id for v in n.inputs.values() if _is_link(v)} for n in nodes}
    done, order = set(), []
    while len(order) < len(nodes):
        for n in nodes:
            if n.id not in done and deps[n.id] <= done:
                done.add(n.id)
                order.append(n)
                break
        else:
            raise ValueError("the graph has a cycle")
    return order


def _depth(nodes: list[Node]) -> dict[int, int]:
    """Column of each node: the longest chain of links from a source (notes go in column 0)."""
    depth = {}
    for n in _topological(nodes):
        srcs = [v[0].id for v in n.inputs.values() if _is_link(v)]
        depth[n.id] = 1 + max(depth[s] for s in srcs) if srcs else 0
    return depth


def _size(n: Node, ui: dict) -> list[int]:
    """A size the front end can draw the node in: its socket rows, then its widgets (multiline text taller)."""
    if n.type in NOTE_TYPES:
        return [360, 200]
    if n.type == "PreviewImage":
        return [320, 320]
    if n.type == "PreviewAny":
        return [380, 240]
    slots = max(sum("widget" not in i for i in ui["inputs"]), len(ui["outputs"]))  # widget sockets share a row
    multiline = ui["_multiline"]  # text boxes; the rest are one-line widgets
    widgets = len(ui["widgets_values"]) - multiline
    return [340 if multiline else 300, 36 + 22 * slots + 26 * widgets + 100 * multiline]


def _layout(nodes: list[Node], ui: dict) -> tuple[dict, dict]:
    """Left to right by depth. In a column, nodes go in the order of their sources' heights, each as level with
    the mean top of its sources as the node above it allows, so that links run mostly straight."""
    depth, size = _depth(nodes), {n.id: _size(n, ui[n.id]) for n in nodes}
    columns: dict[int, list[Node]] = {}
    for n in nodes:
        columns.setdefault(depth[n.id], []).append(n)
    pos, x = {}, 50
    for col in sorted(columns):
        wanted = {n.id: _mean_source(n, lambda src: pos[src.id][1], default=50) for n in columns[col]}
        y = 50
        for n in sorted(columns[col], key=lambda n: wanted[n.id]):  # stable: node order among equals
            y = max(y, wanted[n.id])
            pos[n.id] = [x, round(y)]
            y += size[n.id][1] + 60
        x += max(size[n.id][0] for n in columns[col]) + 70
    return pos, size


def _mean_source(n: Node, value, default: float) -> float:
    srcs = [v[0] for v in n.inputs.values() if _is_link(v)]
    return sum(value(src) for src in srcs) / len(srcs) if srcs else default


def _ordered_node(node: dict) -> dict:
    keys = ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "title", "properties",
            "widgets_values", "color", "bgcolor")  # fmt: skip
    return {k: node[k] for k in keys if k in node}


# -- the three workflows ----------------------------------------------------------------------------------------
