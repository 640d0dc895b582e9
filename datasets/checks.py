"""Checks of a COCO-format detection file, run when a dataset is built: whatever would fail deep
in a training epoch, or be silently ignored or misread, is refused at once with one line that
names the file, the entry and the fix."""
import json
import math
import os
from pathlib import Path

from util.errors import UserInputError


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


REQUIRED_KEYS = ("images", "annotations", "categories")
MAX_IMAGE_ID = 2**53  # float64 holds every integer below it exactly
GZIP_MAGIC = b"\x1f\x8b"


def read_detection_json(ann_file):
    """The parsed JSON of a COCO detection file (parse_detection_json), refused with one line when it
    cannot be read or is not UTF-8 text (a gzipped file would end in a UnicodeDecodeError)."""
    return parse_detection_json(_utf8_text(ann_file), ann_file)


def _utf8_text(ann_file):
    # a function of its own so that the bytes are freed before parsing (COCO train's file is 450 MB)
    try:
        raw = Path(ann_file).read_bytes()
    except OSError as err:
        raise UserInputError(f"annotation file {ann_file} cannot be read ({err.strerror}); "
                             "check its permissions") from None
    try:
        return raw.decode("utf-8-sig")  # -sig: accept the byte-order mark some Windows tools write
    except UnicodeDecodeError as err:
        if raw.startswith(GZIP_MAGIC):
            raise UserInputError(f"annotation file {ann_file} is not a UTF-8 JSON file (gzip-compressed); "
                                 f"decompress it under the same name, {Path(ann_file).name}") from None
        raise UserInputError(f"annotation file {ann_file} is not a UTF-8 JSON file (byte {err.start} is not "
                             "UTF-8); save it as UTF-8 JSON") from None


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


def check_detection_file(data, ann_file, category_ids=None, category_file=None):
    """data: the parsed JSON of ann_file (a dict with images, annotations, categories).
    category_ids: the ids the model classifies, read from category_file (the validation split's
    annotation file); every annotation must use one of them. Returns None; raises UserInputError on
    the first problem."""
    def fail(message):
        raise UserInputError(f"annotation file {ann_file}: {message}")

    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            fail(f"'{key}' must be a list")

    image_ids = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            fail(f"images[{i}] has no integer 'id'")
        if not 0 <= image["id"] < MAX_IMAGE_ID:
            fail(f"images[{i}] has id {image['id']}; image ids must be in 0..2**53 - 1 (the evaluation holds them "
                 "as float64, where larger ones collide); renumber the images")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            fail(f"images[{i}] (id {image['id']}) has no 'file_name'")
        if image["id"] in image_ids:
            fail(f"image id {image['id']} appears twice in 'images'")
        image_ids.add(image["id"])

    categories = category_ids_of(data, ann_file)
    if category_ids is None:
        category_ids, category_file = categories, ann_file
    allowed = set(category_ids)

    index_of_id = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            fail(f"annotations[{i}] is not an object")
        fail_on_annotation_id(ann, i, index_of_id, fail)
        where = f"annotations[{i}] (id {ann['id']})"
        if ann.get("image_id") not in image_ids:
            fail(f"{where} refers to image id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in allowed:
            fail(unknown_category(where, ann.get("category_id"), allowed, ann_file, category_file))
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            fail(f"{where} has bbox {bbox!r}; expected [x, y, width, height], four finite numbers")
        if bbox[2] < 0 or bbox[3] < 0:
            fail(f"{where} has a negative width or height in bbox {bbox}")
        if not _is_number(ann.get("area")) or ann["area"] < 0:
            fail(f"{where} has no 'area' of 0 or more (COCO evaluation sorts boxes by it)")
        if ann.get("iscrowd", 0) not in (0, 1):
            fail(f"{where} has iscrowd {ann['iscrowd']!r}; expected 0 or 1")


def fail_on_annotation_id(ann, index, index_of_id, fail):
    """Each annotation needs an integer id of 1 or more, once in the file: pycocotools indexes
    annotations by id (a repeated id swaps ground truth between images, a missing one is a
    KeyError), and its evaluation takes a match to id 0 for no match, unlike the other backends."""
    ann_id = ann.get("id")
    if not _is_int(ann_id) or ann_id < 1:
        found = f"has id {ann_id!r}" if "id" in ann else "has no 'id'"
        fail(f"annotations[{index}] {found}; give every annotation a unique integer id of 1 or more")
    if ann_id in index_of_id:
        fail(f"annotations[{index}] has id {ann_id}, as annotations[{index_of_id[ann_id]}] does; give every "
             "annotation a unique id (evaluation indexes annotations by id)")
    index_of_id[ann_id] = index


def unknown_category(where, category_id, allowed, ann_file, category_file):
    """The message for an annotation whose category the model does not classify, naming the file
    the model's classes come from (for the train split, the validation split's file)."""
    known = f"{len(allowed)} ids, {min(allowed)}..{max(allowed)}" if allowed else "no ids"
    found = f"{where} has category id {category_id!r}, not one of the dataset's categories"
    if category_file is not None and str(category_file) == str(ann_file):
        return f"{found} (this file's 'categories', {known}); fix the annotation or add the category to 'categories'"
    source = f"the 'categories' of {category_file}" if category_file is not None else "the given category ids"
    return (f"{found}, the model's classes: those are {source} ({known}); add category {category_id!r} "
            "there, or fix the annotation")


def _names_in(folder):
    try:
        return set(os.listdir(folder))
    except OSError:  # no such folder: every image said to be in it is missing
        return set()


def check_image_files(data, ann_file, img_folder):
    """Every image's file_name must be in img_folder (subfolders allowed), or the epoch that reads it
    fails (for val, after a whole training epoch). One listing per folder, not a stat per image:
    COCO train has 118k images, and stats are slow on networked filesystems."""
    listings = {}
    missing = []
    for image in data["images"]:
        folder, name = os.path.split(os.path.join(img_folder, image["file_name"]))
        if folder not in listings:
            listings[folder] = _names_in(folder)
        if name not in listings[folder]:
            missing.append(image)
    if missing:
        first = missing[0]
        raise UserInputError(f"image file {os.path.join(img_folder, first['file_name'])} (image id {first['id']}) "
                             f"does not exist: {len(missing)} of the {len(data['images'])} images listed in "
                             f"{ann_file} are missing; copy them into {img_folder} or remove them from 'images'")


def check_split_is_usable(data, ann_file, image_set):
    """A split must have images, and objects to learn or to find: without them training learns
    nothing and evaluation reports AP -1."""
    if not data["images"]:
        raise UserInputError(f"annotation file {ann_file} lists no images: the {image_set} split is empty")
    if not any(ann.get("iscrowd", 0) == 0 for ann in data["annotations"]):
        raise UserInputError(f"annotation file {ann_file} has no (non-crowd) object annotations: the {image_set} "
                             "split has nothing to " + ("learn" if image_set == "train" else "evaluate"))
