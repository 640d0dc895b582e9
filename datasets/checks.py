"""Checks of a COCO-format detection file, run when a dataset is built: whatever would fail deep
in a training epoch, or be silently ignored or misread, is refused at once with one line that
names the file, the entry and the fix."""
import json
import math

from util.errors import UserInputError


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


REQUIRED_KEYS = ("images", "annotations", "categories")


def parse_detection_json(text, ann_file):
    """The JSON object of a COCO detection file, refused unless it parses and has the three lists."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UserInputError(f"annotation file {ann_file} is not a valid COCO JSON file ({type(err).__name__}: "
                             f"{err}); expected a JSON object with keys {', '.join(REQUIRED_KEYS)}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"annotation file {ann_file} is not a valid COCO JSON file (a JSON "
                             f"{type(data).__name__}); expected a JSON object with keys {', '.join(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UserInputError(f"annotation file {ann_file} lacks the key(s) {', '.join(missing)}; a COCO "
                             f"detection file needs {', '.join(REQUIRED_KEYS)}")
    return data


def category_ids_of(data, ann_file):
    """The sorted category ids of a parsed detection file, each an integer of 0 or more, once."""
    if not isinstance(data["categories"], list):
        raise UserInputError(f"annotation file {ann_file}: 'categories' must be a list")
    ids = []
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or category["id"] < 0:
            raise UserInputError(f"annotation file {ann_file}: categories[{i}] has no integer 'id' of 0 or more")
        ids.append(category["id"])
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise UserInputError(f"annotation file {ann_file}: category id(s) {twice} appear twice in 'categories'")
    return tuple(sorted(ids))


def check_detection_file(data, ann_file, category_ids=None):
    """data: the parsed JSON of ann_file (a dict with images, annotations, categories).
    category_ids: the ids the model classifies (the validation split's categories); every
    annotation must use one of them. Returns None; raises UserInputError on the first problem."""
    def fail(message):
        raise UserInputError(f"annotation file {ann_file}: {message}")

    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            fail(f"'{key}' must be a list")

    image_ids = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            fail(f"images[{i}] has no integer 'id'")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            fail(f"images[{i}] (id {image['id']}) has no 'file_name'")
        if image["id"] in image_ids:
            fail(f"image id {image['id']} appears twice in 'images'")
        image_ids.add(image["id"])

    categories = category_ids_of(data, ann_file)
    allowed = set(categories if category_ids is None else category_ids)

    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict):
            fail(f"{where} is not an object")
        if ann.get("image_id") not in image_ids:
            fail(f"{where} refers to image id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in allowed:
            known = f"{min(allowed)}..{max(allowed)}" if allowed else "none"
            fail(f"{where} has category id {ann.get('category_id')!r}, not one of the dataset's categories "
                 f"({len(allowed)} ids, {known}); fix the annotation or add the category")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            fail(f"{where} has bbox {bbox!r}; expected [x, y, width, height], four finite numbers")
        if bbox[2] < 0 or bbox[3] < 0:
            fail(f"{where} has a negative width or height in bbox {bbox}")
        if not _is_number(ann.get("area")) or ann["area"] < 0:
            fail(f"{where} has no 'area' of 0 or more (COCO evaluation sorts boxes by it)")
        if ann.get("iscrowd", 0) not in (0, 1):
            fail(f"{where} has iscrowd {ann['iscrowd']!r}; expected 0 or 1")


def check_split_is_usable(data, ann_file, image_set):
    """A split must have images, and objects to learn or to find: without them training learns
    nothing and evaluation reports AP -1."""
    if not data["images"]:
        raise UserInputError(f"annotation file {ann_file} lists no images: the {image_set} split is empty")
    if not any(ann.get("iscrowd", 0) == 0 for ann in data["annotations"]):
        raise UserInputError(f"annotation file {ann_file} has no (non-crowd) object annotations: the {image_set} "
                             "split has nothing to " + ("learn" if image_set == "train" else "evaluate"))
