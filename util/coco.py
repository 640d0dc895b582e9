"""Facts of the COCO 2017 detection label space, which the released checkpoints were trained on."""

# The 80 category ids of the detection annotations: 1..90 without the 10 unused ids.
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
