"""Images and prompts for test_llava.py.

Sources, in this order:
  --dataset FILE   .json (a list) or .jsonl rows, either {"image": ..., "prompt": ...} or the LLaVA-Instruct
                   format {"id", "image", "conversations": [{"from": "human", "value": "...<image>..."}, ...]}
                   (the original's instruct150k_subset.json), whose first human turn becomes
                   "USER: <value> ASSISTANT:"; image paths resolve against --image-dir (else the file's folder);
  --image-dir DIR  every file in DIR (hidden files aside), sorted by name, each with --prompt;
  neither          a few images generated here (offline run), each with --prompt.
Every image in [--start, --end) is opened before any model runs, so a bad file fails fast (one line naming
it) unless --skip-bad-images, which skips it and reports it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from utils.data import BUILTIN_NAME, HUB_DATASETS
from utils.errors import UserError, first_line
from utils.models import cache_dir

IMAGE_PLACEHOLDER = "<image>"
GENERATED_IMAGES = 4
INSTRUCT_TEMPLATE = "USER: {question} ASSISTANT:"  # LLaVA-1.5's conversation format


@dataclass(frozen=True)
class ImagePrompt:
    """One row before tokenization: an image file and a prompt holding the image placeholder."""

    index: int
    image: Path
    text: str


def generated_images(folder: Path | None = None, count: int = GENERATED_IMAGES) -> Path:
    """A folder of `count` small synthetic PNGs (bands, a disc, a checkerboard, a gradient), written once."""
    from PIL import Image, ImageDraw

    folder = folder or cache_dir() / "llava" / "images"
    if len(list(folder.glob("*.png"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    size = 64
    for index in range(count):
        image = Image.new("RGB", (size, size), (240, 240, 235))
        draw = ImageDraw.Draw(image)
        kind = index % 4
        if kind == 0:
            for band in range(4):
                draw.rectangle([0, band * 16, size, band * 16 + 8], fill=(30 + 50 * band, 90, 200 - 40 * band))
        elif kind == 1:
            draw.ellipse([12, 12, 52, 52], fill=(220, 60, 40))
        elif kind == 2:
            for x in range(0, size, 16):
                for y in range(0, size, 16):
                    if (x + y) // 16 % 2 == 0:
                        draw.rectangle([x, y, x + 15, y + 15], fill=(20, 20, 20))
        else:
            for x in range(size):
                draw.line([x, 0, x, size], fill=(4 * x, 255 - 4 * x, 128))
        image.save(folder / f"generated-{index:02d}.png")
    return folder


def list_images(folder: str | Path) -> list[Path]:
    """Every non-hidden file of `folder`, sorted by name (each is meant to be an image)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"--image-dir {folder} does not exist or is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"--image-dir {folder} holds no images")
    return files


def _dataset_objects(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --dataset {path}: {first_line(exc)}") from exc
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--dataset {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, list):
        raise UserError(f"--dataset {path}: expected a list of rows, got {type(data).__name__}")
    return data


def _row_prompt(obj, where: str) -> tuple[str, str]:
    """(image field, prompt text) of one dataset row."""
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise UserError(f"{where}: expected an object with an 'image' path")
    if isinstance(obj.get("prompt"), str):
        return obj["image"], obj["prompt"]
    turns = obj.get("conversations")
    if isinstance(turns, list):
        human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
        if isinstance(human, str):
            return obj["image"], INSTRUCT_TEMPLATE.format(question=human)
    raise UserError(f"{where}: needs a 'prompt' string or LLaVA-Instruct 'conversations' with a human turn")


def image_prompts(dataset: str | None, image_dir: str | None, prompt: str, start: int, end: int) -> list[ImagePrompt]:
    """Rows [start, end) of the chosen source (module docstring), images not opened yet."""
    if dataset is not None:
        path = Path(dataset).expanduser()
        if not path.is_file() and dataset in (BUILTIN_NAME, *HUB_DATASETS):
            raise UserError(f"--dataset {dataset} is a text dataset with no images, and test_llava.py decodes image "
                            "prompts: pass --image-dir FOLDER (each image asked --prompt) or --dataset FILE of image "
                            "rows (the original's instruct150k_subset.json, with --image-dir where its COCO images "
                            "are); text prompts go to test_greedyS.py")
        if not path.is_file():
            raise UserError(f"--dataset {dataset} does not exist (a .json or .jsonl file of image rows)")
        base = Path(image_dir).expanduser() if image_dir is not None else path.parent
        if image_dir is not None and not base.is_dir():
            raise UserError(f"--image-dir {image_dir} does not exist or is not a folder")
        objects = _dataset_objects(path)
        rows = [(index, *_row_prompt(obj, f"{path} row {index}")) for index, obj in enumerate(objects)]
        rows = [(index, base / image, text) for index, image, text in rows]
    else:
        files = list_images(image_dir) if image_dir is not None else list_images(generated_images())
        rows = [(index, file, prompt) for index, file in enumerate(files)]
    if start >= len(rows):
        raise UserError(f"--start {start} is past the {len(rows)} images")
    return [ImagePrompt(index, Path(image), text) for index, image, text in rows[start:end]]


def open_image(path: Path):
    """The image as RGB; UserError naming the file when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {first_line(exc)} (--skip-bad-images to go on without it)") from exc


def readable(rows: list[ImagePrompt], skip_bad: bool) -> tuple[list[tuple[ImagePrompt, object]], list[str]]:
    """(row, opened image) for every row whose image opens, and the one-line reasons of those skipped;
    without `skip_bad` the first bad image is a UserError."""
    kept, skipped = [], []
    for row in rows:
        try:
            kept.append((row, open_image(row.image)))
        except UserError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc).split(" (--skip-bad-images")[0])
    if not kept:
        raise UserError(f"no readable image among the {len(rows)} asked for: {skipped[0]}")
    return kept, skipped
