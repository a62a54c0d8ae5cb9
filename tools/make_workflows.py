"""Write the pack's example workflows (example_workflows/*.json, ComfyUI's UI format) and their thumbnails.

ComfyUI lists every example_workflows/*.json of a custom-node pack as a template (GET /workflow_templates)
and shows <name>.jpg next to it. The JSON is what the front end's "Save" writes (litegraph, version 0.4):
nodes with their socket inputs, outputs and widgets_values, plus a links table. widgets_values is positional,
so its order comes from a running server's /object_info: input_order (required, then optional), and after an
INT widget with control_after_generate (explicit, or by default a widget named seed / noise_seed) the front
end's extra "control after generate" value.

usage: python tools/make_workflows.py [--url http://127.0.0.1:8188] [--thumbnails] [--only NAME ...]
  --thumbnails  also run the demo workflows on that server (the demo erase takes ~10 min on 2 CPU cores) and
                save their output images as <name>.jpg; the SD1.5 workflow gets a drawing of its graph.
Not under scripts/: A1111 executes every .py there.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: surgun_core is the repository's own
from workflow_graph import NOTE_TYPES, Graph  # noqa: E402 (tools/ is the script's folder: first on sys.path)

from surgun_core.io import atomic_path  # noqa: E402

OUT_DIR = ROOT / "example_workflows"
THUMB_WIDTH = 512
TOY_SHAPES = "square\ntriangle\ncross\nring"
DEMO_DELTA = "surgun/demo_circle_00001_.safetensors"  # what surgun_demo_erase saves on its first run


def demo_erase(info: dict) -> Graph:
    g = Graph(info)
    demo = g.add("SurgUnDemoModel")
    train = g.add(
        "SurgUnTrain",
        model=demo[0],
        clip=demo[1],
        concepts="circle",
        distractors=TOY_SHAPES,
        kind="object",
        steps=0,
        learning_rate=0.0,
        rank=0,
        blocks="auto",
        calibration=True,
        guidance=0.0,
        seed=0,
    )  # fmt: skip  (0: the toy recipe's values)
    probe = g.add("SurgUnConceptProbe", model=train[0], clip=demo[1], vae=demo[2], base_model=demo[0],
                  concepts="circle", retain_concepts=TOY_SHAPES, kind="object", seeds=4, steps=20, guidance=4.0,
                  scorer="diffusion")  # fmt: skip
    g.add("SurgUnSaveDelta", delta=train[1], filename_prefix="surgun/demo_circle")
    g.add("PreviewAny", title="Train report", source=train[2])
    g.add("PreviewImage", title="Probe: before | after", images=probe[0])
    g.add("PreviewAny", title="Probe report", source=probe[1])
    g.note("**Erase 'circle' from the SurgUn demo model** (nothing to download; ~10 min on 2 CPU cores).\n\n"
           "SurgUn Train picks the attention blocks itself (blocks = auto), trains a rank-4 LoRA and ships the "
           "calibrated step. Concept Probe draws the same seeds with the base and the erased model: circles "
           "should be gone, the other shapes kept. The delta is saved to models/loras/surgun/; open "
           "*surgun_apply_delta* to use it.", title="About this workflow")  # fmt: skip
    return g


def apply_delta(info: dict, delta_file: str = DEMO_DELTA) -> Graph:
    g = Graph(info)
    demo = g.add("SurgUnDemoModel")
    apply = g.add("SurgUnApplyDelta", model=demo[0], strength=1.0, delta_file=delta_file)
    pos = g.add("CLIPTextEncode", title="Positive prompt", clip=demo[1], text="a red circle")
    neg = g.add("CLIPTextEncode", title="Negative prompt", clip=demo[1], text="")
    latent = g.add("EmptyChromaRadianceLatentImage", width=16, height=16, batch_size=4)
    sample = g.add("KSampler", model=apply[0], positive=pos[0], negative=neg[0], latent_image=latent[0], seed=0,
                   steps=20, cfg=4.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)  # fmt: skip
    image = g.add("VAEDecode", samples=sample[0], vae=demo[2])
    g.add("PreviewImage", images=image[0])
    g.note("**Draw with an erased demo model.** Run *surgun_demo_erase* first: it saves "
           f"`{DEMO_DELTA}` (pick the newest file in delta_file). At strength 1 'a red circle' no longer "
           "gives a circle; 0 gives the base model back. Stock LoraLoaderModelOnly loads the same file.",
           title="About this workflow")  # fmt: skip
    return g


def sd15_erase(info: dict) -> Graph:
    g = Graph(info)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    train = g.add("SurgUnTrain", model=ckpt[0], clip=ckpt[1], concepts="Van Gogh", distractors="",
                  kind="style", steps=200, learning_rate=0.002, rank=4, blocks="auto", calibration=True,
                  guidance=7.5, seed=0)  # fmt: skip
    probe = g.add("SurgUnConceptProbe", model=train[0], clip=ckpt[1], vae=ckpt[2], base_model=ckpt[0],
                  concepts="Van Gogh", retain_concepts="Claude Monet\nPablo Picasso\nRembrandt", kind="style",
                  seeds=4, steps=25, guidance=7.5, scorer="diffusion")  # fmt: skip
    g.add("SurgUnSaveDelta", delta=train[1], filename_prefix="surgun/sd15_van_gogh")
    pos = g.add("CLIPTextEncode", title="Positive prompt", clip=ckpt[1],
                text="a starry night over a village, painting by Van Gogh")  # fmt: skip
    neg = g.add("CLIPTextEncode", title="Negative prompt", clip=ckpt[1], text="blurry, low quality")
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sample = g.add("KSampler", model=train[0], positive=pos[0], negative=neg[0], latent_image=latent[0], seed=0,
                   steps=25, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)  # fmt: skip
    image = g.add("VAEDecode", samples=sample[0], vae=ckpt[2])
    g.add("PreviewImage", title="Erased model: 'by Van Gogh'", images=image[0])
    g.add("PreviewImage", title="Probe: before | after", images=probe[0])
    g.add("PreviewAny", title="Probe report", source=probe[1])
    g.note("**Erase an artist's style from Stable Diffusion 1.5.** Needs `v1-5-pruned-emaonly.safetensors` "
           "in models/checkpoints and a GPU (minutes; hours on a CPU). Distractors empty: the built-in list "
           "of styles. The KSampler draws with the erased model; the saved delta in models/loras/surgun/ "
           "loads with Apply Unlearning Delta or stock LoraLoaderModelOnly.", title="About this workflow")  # fmt: skip
    return g


WORKFLOWS = {  # name -> (builder, files it may name that need not exist on this server)
    "surgun_demo_erase": (demo_erase, ()),
    "surgun_apply_delta": (apply_delta, ("delta_file",)),
    "surgun_sd15_erase": (sd15_erase, ("ckpt_name",)),
}


# -- server -----------------------------------------------------------------------------------------------------
def get_json(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def server_info(url: str) -> dict:
    """/object_info plus the versions the saved JSON records (prefixed keys: no node is called that)."""
    info = get_json(url, "/object_info")
    system = get_json(url, "/system_stats")["system"]
    info["_frontend_version"] = system.get("required_frontend_version") or "1.35.9"
    info["_comfyui_version"] = system.get("comfyui_version") or "unknown"
    return info


def run(url: str, prompt: dict, timeout: float = 3600) -> dict:
    """POST /prompt and wait for its history entry; raises with ComfyUI's messages if it fails."""
    body = json.dumps({"prompt": prompt, "client_id": "surgun-make-workflows"}).encode()
    req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        pid = json.loads(r.read())["prompt_id"]
    end = time.time() + timeout
    while time.time() < end:
        entry = get_json(url, f"/history/{pid}").get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"prompt {pid} failed: {entry['status'].get('messages')}")
            return entry
        time.sleep(2)
    raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")


def fetch_images(url: str, entry: dict, node_id: int) -> list[Image.Image]:
    out = []
    for img in entry["outputs"][str(node_id)]["images"]:
        q = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{url}/view?{q}", timeout=60) as r:
            out.append(Image.open(io.BytesIO(r.read())).convert("RGB"))
    return out


# -- thumbnails -------------------------------------------------------------------------------------------------
def tile(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (w * columns, h * rows), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def to_thumbnail(image: Image.Image) -> Image.Image:
    """~THUMB_WIDTH px wide; tiny pixel art is enlarged with nearest neighbour so it stays sharp."""
    scale = THUMB_WIDTH / image.width
    resample = Image.NEAREST if image.width * 4 <= THUMB_WIDTH else Image.LANCZOS
    return image.resize((THUMB_WIDTH, max(1, round(image.height * scale))), resample)


def diagram(workflow: dict, titles: dict[str, str], caption: str) -> Image.Image:
    """The graph as a grid of boxes (node titles) joined by curved arrows: the workflow's columns (same x) left
    to right, each column's nodes top down as the workflow has them."""
    nodes = [n for n in workflow["nodes"] if n["type"] not in NOTE_TYPES]
    xs = sorted({n["pos"][0] for n in nodes})
    cols = {x: sorted((n for n in nodes if n["pos"][0] == x), key=lambda n: n["pos"][1]) for x in xs}
    pad, gap, top, box_h, row_gap = 12, 22, 34, 46, 22
    box_w = (THUMB_WIDTH - 2 * pad - gap * (len(xs) - 1)) / len(xs)
    sources = {n["id"]: [] for n in nodes}
    for _, src, _, dst, _, _ in workflow["links"]:
        sources[dst].append(src)
    boxes, row = {}, {}
    for ci, x in enumerate(xs):
        r = -1
        for n in cols[x]:  # one row below the node above, or level with the mean row of its sources
            srcs = sources[n["id"]]
            r = row[n["id"]] = max(r + 1, round(sum(row[s] for s in srcs) / len(srcs)) if srcs else 0)
            bx, by = pad + ci * (box_w + gap), top + r * (box_h + row_gap)
            boxes[n["id"]] = (bx, by, bx + box_w, by + box_h)
    rows = max(row.values()) + 1
    im = Image.new("RGB", (THUMB_WIDTH, top + rows * (box_h + row_gap) - row_gap + pad), "#1e1e1e")
    draw = ImageDraw.Draw(im)
    font, big = ImageFont.load_default(size=11), ImageFont.load_default(size=15)
    draw.text((pad, 9), caption, font=big, fill="white")
    for _, src, _, dst, _, _ in workflow["links"]:
        (_, ay0, ax1, ay1), (bx0, by0, _, by1) = boxes[src], boxes[dst]
        p0, p3 = (ax1, (ay0 + ay1) / 2), (bx0 - 1, (by0 + by1) / 2)
        bend = max(12.0, (p3[0] - p0[0]) / 2)
        p1, p2 = (p0[0] + bend, p0[1]), (p3[0] - bend, p3[1])
        curve = [_bezier(p0, p1, p2, p3, t / 24) for t in range(25)]
        draw.line(curve, fill="#8c8c8c", width=2)
        draw.polygon([p3, (p3[0] - 7, p3[1] - 4), (p3[0] - 7, p3[1] + 4)], fill="#8c8c8c")
    for n in nodes:
        x0, y0, x1, y1 = boxes[n["id"]]
        fill = "#2b5278" if n["type"].startswith("SurgUn") else "#3c3c3c"
        draw.rounded_rectangle((x0, y0, x1, y1), radius=6, fill=fill, outline="#d0d0d0")
        text = _wrap(n.get("title") or titles.get(n["type"], n["type"]), draw, font, x1 - x0 - 8)
        draw.multiline_text(((x0 + x1) / 2, (y0 + y1) / 2), text, font=font, fill="white", anchor="mm", align="center")
    return im


def _bezier(p0, p1, p2, p3, t: float) -> tuple[float, float]:
    u = 1 - t
    return tuple(u**3 * a + 3 * u * u * t * b + 3 * u * t * t * c + t**3 * d for a, b, c, d in zip(p0, p1, p2, p3))


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: float) -> str:
    """Words into at most three lines no wider than `width` pixels."""
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(trial, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = trial
    return "\n".join(lines[:3])


def save_jpeg(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=90)


def write_json(data: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI with this pack loaded")
    ap.add_argument("--thumbnails", action="store_true", help="run the demo workflows and save <name>.jpg")
    ap.add_argument("--only", nargs="*", choices=list(WORKFLOWS), help="write only these workflows")
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    info = server_info(url)
    titles = {k: v.get("display_name") or k for k, v in info.items() if isinstance(v, dict)}
    names = args.only or list(WORKFLOWS)
    saved_delta = None
    for name in names:
        build, allow_missing = WORKFLOWS[name]
        graph = build(info)
        ui = graph.to_ui(allow_missing)
        write_json(ui, OUT_DIR / f"{name}.json")
        print(f"wrote {OUT_DIR / name}.json ({len(ui['nodes'])} nodes, {len(ui['links'])} links)")
        if not args.thumbnails:
            continue
        if name == "surgun_sd15_erase":
            thumb = diagram(ui, titles, "Erase a style from Stable Diffusion 1.5 (SurgUn)")
        else:
            if name == "surgun_apply_delta":  # the file the demo erase just saved, when it ran here
                graph = apply_delta(info, saved_delta or DEMO_DELTA)
            print(f"running {name} on {url} ...")
            t0 = time.time()
            entry = run(url, graph.to_api())
            print(f"  done in {time.time() - t0:.0f} s")
            preview = next(n.id for n in graph.nodes if n.type == "PreviewImage")
            if name == "surgun_demo_erase":
                save = next(n.id for n in graph.nodes if n.type == "SurgUnSaveDelta")
                saved_delta = entry["outputs"][str(save)]["text"][0].removeprefix("saved models/loras/")
                thumb = fetch_images(url, entry, preview)[0]
            else:
                thumb = tile(fetch_images(url, entry, preview), columns=2)
        save_jpeg(to_thumbnail(thumb), OUT_DIR / f"{name}.jpg")
        print(f"wrote {OUT_DIR / name}.jpg")


if __name__ == "__main__":
    main()
