"""Prompt templates and class names for CLIP zero-shot heads, per dataset (pure data).

CLIP's zero-shot classifier for a task is the averaged text embedding of every class name
inserted into a handful of prompt templates (Radford et al. 2021, §3.1.4). The task-vector
literature (Ilharco et al. 2023; Ortiz-Jiménez et al. 2023; OrthoReg, Liu et al. 2026)
freezes these heads during fine-tuning, so a task vector changes only the image encoder and
vectors of different tasks share one set of heads. The templates below are that
literature's (Ilharco et al.'s ``templates.py``, kept by the OrthoReg code): a few phrasings
that say what kind of image it is (satellite photo, traffic sign, texture, number) —
Cars 8, DTD 8, EuroSAT 3, GTSRB 3, MNIST 1, RESISC45 18, SUN397 2, SVHN 1 — and OpenAI's
80 ImageNet prompts for the negation control.

Class names: a dataset's classes are its class *folders* (``orthoreg.clip.data``), and
each folder gets the name used in the prompts by, in order,

1. ``<data-root>/<Name>/classnames.txt``: lines ``<folder><TAB><class name>``;
2. the dataset's built-in table below (``DatasetSpec.names``; numeric folder names also
   match after dropping leading zeros, so GTSRB's ``00012`` finds entry ``12``);
3. the folder name itself, underscores as spaces (``baseball_diamond`` → ``baseball
   diamond``).

Tables are written out for the small datasets whose folder names are not their prompt
names (EuroSAT's ``HerbaceousVegetation``, GTSRB's numbered folders) or are few enough to
check the layout against (DTD, RESISC45, MNIST, SVHN). SUN397, Cars and ImageNet have
hundreds of classes: their names come from the folders or ``classnames.txt``; for ImageNet
folders named by WordNet id (``n01440764``…), the standard 1000 names that open_clip ships
are used when no ``classnames.txt`` is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# ------------------------------------------------------------------------------- templates
CARS_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)
DTD_TEMPLATES = (
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
    "a photo of the {} thing.",
    "a photo of the {} object.",
)
EUROSAT_TEMPLATES = (
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
)
GTSRB_TEMPLATES = (
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
)
DIGIT_TEMPLATES = ('a photo of the number: "{}".',)
#: 18 prompts: {imagery, photo, view} × {satellite, aerial} × {"", "a", "the"} (Ilharco et al.)
RESISC45_TEMPLATES = (
    "satellite imagery of {}.",
    "aerial imagery of {}.",
    "satellite photo of {}.",
    "aerial photo of {}.",
    "satellite view of {}.",
    "aerial view of {}.",
    "satellite imagery of a {}.",
    "aerial imagery of a {}.",
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    "satellite view of a {}.",
    "aerial view of a {}.",
    "satellite imagery of the {}.",
    "aerial imagery of the {}.",
    "satellite photo of the {}.",
    "aerial photo of the {}.",
    "satellite view of the {}.",
    "aerial view of the {}.",
)
SUN397_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")
#: OpenAI's 80 ImageNet prompts (Radford et al. 2021; open_clip's
#: ``OPENAI_IMAGENET_TEMPLATES``, in its order), what the literature's ImageNet head uses
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
GENERIC_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")

# ------------------------------------------------------------------------------- class names
DIGITS = {str(d): str(d) for d in range(10)}

EUROSAT_NAMES = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}

# GTSRB's 43 classes by number (the folders are 00000 … 00042 in the official release),
# described by the sign's look, since "speed limit 30" alone says little to a text encoder
GTSRB_NAMES = {str(i): name for i, name in enumerate((
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
))}

DTD_NAMES = {name: name for name in (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly",
    "gauzy", "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined",
    "marbled", "matted", "meshed", "paisley", "perforated", "pitted", "pleated",
    "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled",
    "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
)}

RESISC45_NAMES = {folder: folder.replace("_", " ") for folder in (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge",
    "chaparral", "church", "circular_farmland", "cloud", "commercial_area",
    "dense_residential", "desert", "forest", "freeway", "golf_course", "ground_track_field",
    "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
    "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway",
    "sea_ice", "ship", "snowberg", "sparse_residential", "stadium", "storage_tank",
    "tennis_court", "terrace", "thermal_power_station", "wetland",
)}

_WNID = re.compile(r"^n\d{8}$")


def _imagenet_wnid_names(folders: Sequence[str]) -> list[str] | None:
    """open_clip's 1000 ImageNet names, when the folders are the 1000 sorted WordNet ids."""
    if len(folders) != 1000 or not all(_WNID.match(f) for f in folders):
        return None
    from open_clip import IMAGENET_CLASSNAMES  # ordered like the sorted wnids

    return list(IMAGENET_CLASSNAMES)


# ------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetSpec:
    """What the CLIP recipe knows about one dataset.

    ``epochs`` is the fine-tuning length of the recipe (Ilharco et al. 2023, kept by
    OrthoReg): about 2000 steps at batch 128 for every task. ``names`` maps folder names to
    prompt names; ``ordered_names`` may supply all names at once from the folder list.
    """

    name: str
    templates: tuple[str, ...]
    epochs: int | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    ordered_names: Callable[[Sequence[str]], list[str] | None] | None = None


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("Cars", CARS_TEMPLATES, epochs=35),
    DatasetSpec("DTD", DTD_TEMPLATES, epochs=76, names=DTD_NAMES),
    DatasetSpec("EuroSAT", EUROSAT_TEMPLATES, epochs=12, names=EUROSAT_NAMES),
    DatasetSpec("GTSRB", GTSRB_TEMPLATES, epochs=11, names=GTSRB_NAMES),
    DatasetSpec("MNIST", DIGIT_TEMPLATES, epochs=5, names=DIGITS),
    DatasetSpec("RESISC45", RESISC45_TEMPLATES, epochs=15, names=RESISC45_NAMES),
    DatasetSpec("SUN397", SUN397_TEMPLATES, epochs=14),
    DatasetSpec("SVHN", DIGIT_TEMPLATES, epochs=4, names=DIGITS),
    # the negation control (the pretraining domain); never fine-tuned in the recipe
    DatasetSpec("ImageNet", IMAGENET_TEMPLATES, ordered_names=_imagenet_wnid_names),
)}

#: the eight fine-tuning tasks of the paper's CLIP benchmark, and the negation control
PAPER_TASKS: tuple[str, ...] = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45",
                                "SUN397", "SVHN")
CONTROL_TASK = "ImageNet"


def base_task_name(name: str) -> str:
    """``CarsVal`` → ``Cars``: the literature's name for "train minus the held-out val"."""
    return name[:-3] if name.lower().endswith("val") and len(name) > 3 else name


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a known dataset (case-insensitive, ``…Val`` accepted), else a generic one.

    Unknown names are allowed on purpose: any folder in the documented layout is a task,
    with generic templates and no preset length (``--epochs``/``--steps`` must be given).
    """
    base = base_task_name(name)
    for key, spec in DATASETS.items():
        if key.lower() == base.lower():
            return spec
    return DatasetSpec(base, GENERIC_TEMPLATES)


def folder_display_name(folder: str) -> str:
    """The fallback prompt name of a class folder: underscores become spaces."""
    return folder.replace("_", " ").strip()


def resolve_classnames(spec: DatasetSpec, folders: Sequence[str],
                       overrides: Mapping[str, str] | None = None) -> list[str]:
    """Prompt names for ``folders`` (in their order): overrides, then the table, then folders."""
    overrides = dict(overrides or {})
    ordered = None
    if spec.ordered_names is not None and not overrides:
        ordered = spec.ordered_names(folders)
    if ordered is not None:
        return list(ordered)
    names = []
    for folder in folders:
        if folder in overrides:
            names.append(overrides[folder])
            continue
        key = str(int(folder)) if folder.isdigit() and folder not in spec.names else folder
        names.append(spec.names.get(key) or folder_display_name(folder))
    return names


def unknown_folders(spec: DatasetSpec, folders: Sequence[str]) -> list[str]:
    """Class folders absent from the dataset's built-in table (empty when it has none).

    A non-empty answer usually means a different export layout (e.g. GTSRB by sign name):
    the prompts then fall back to folder names, which is worth a warning, not an error.
    """
    if not spec.names:
        return []
    return [f for f in folders
            if f not in spec.names and not (f.isdigit() and str(int(f)) in spec.names)]


def parse_classnames_file(text: str, source: str = "classnames.txt") -> dict[str, str]:
    """``<folder><TAB><class name>`` per line; blank lines and ``#`` comments are skipped."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"{source}:{number}: expected '<folder><TAB><class name>', "
                             f"got {line!r}")
        folder, name = line.split("\t", 1)
        if not folder.strip() or not name.strip():
            raise ValueError(f"{source}:{number}: empty folder or class name in {line!r}")
        out[folder.strip()] = name.strip()
    return out
