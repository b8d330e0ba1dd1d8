"""Class vocabularies. Plain data, no torch, so the store and the UI can import it cheaply."""

#: The nine thoracic findings of the OXnet paper (Sect. 3.1), in the paper's order.
PAPER_CLASSES: tuple[str, ...] = (
    "Aortic calcification",
    "Cardiomegaly",
    "Fracture",
    "Mass",
    "Nodule",
    "Pleural effusion",
    "Pneumonia",
    "Pneumothorax",
    "Tuberculosis",
)

#: The eight findings of NIH ChestX-ray14's BBox_List_2017.csv (COCO category ids 1..8 in ../shared/data/nih-cxr).
NIH_BOX_CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
)

#: Image-level label that means "none of the classes is present".
NO_FINDING = "No Finding"
