"""In-memory datasets for the test tasks (no hub, no files)."""

import datasets

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is 2 plus 2?", "4"),
    ("What color is the sky on a clear day?", "Blue"),
    ("How many legs does a spider have?", "8"),
    ("What is the opposite of hot?", "Cold"),
    ("Which planet do we live on?", "Earth"),
    ("What is frozen water called?", "Ice"),
    ("What do bees make?", "Honey"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("How many days are in a week?", "7"),
]

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny afternoon in the park.",
    "Large language models are evaluated on benchmarks such as MMLU, which covers 57 subjects.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.",
    "In 1969, astronauts landed on the Moon for the first time and walked on its surface.",
]


def load_generation(**_):
    rows = [{"question": q, "answer": a} for q, a in QUESTIONS]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_text(**_):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": t} for t in TEXTS])})


# NOTE: openings the small model continues for hundreds of tokens without its stop string
# (conserve_tiny_long: generations long enough to be interrupted and continued).
STORIES = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the Roman Empire begins",
    "Chapter 1\n\nThe train pulled into the station at dawn, and",
    "The following is an essay about climate change.\n\n",
]


def load_stories(**_):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"opening": s} for s in STORIES])})
