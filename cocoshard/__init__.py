"""cocoshard: train multi-label classifiers for the MS COCO classification challenge, fast.

    $ cocoshard pack --root ms-coco --out shards       # the folder, once, into WebDataset shards
    $ cocoshard train --amp --shards shards            # streaming trainer, tuned thresholds
    $ cocoshard predict --checkpoint runs/NAME/best.pt --images ms-coco/images/test-resized/test-resized
    $ cocoshard demo                                   # the whole flow on synthetic data
"""

__version__ = "0.1.0"

# The challenge's class tuple: a `.cls` file holds indices into it, one per line.
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
NUM_CLASSES = len(CLASSES)
