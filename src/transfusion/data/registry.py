"""`data.dataset` name -> Dataset (dataset.py). The one place that knows which datasets exist."""

from __future__ import annotations

from transfusion.config import ConfigError, DataConfig
from transfusion.data.colour_fashion import ColourFashion
from transfusion.data.dataset import Dataset
from transfusion.data.edits import EditFolderDataset, RecolourDataset
from transfusion.data.emoji import EmojiDataset
from transfusion.data.folder import FolderDataset
from transfusion.data.shards_dataset import ShardsDataset

DATASETS: dict[str, type[Dataset]] = {
    cls.name: cls for cls in (ColourFashion, FolderDataset, EditFolderDataset, RecolourDataset, ShardsDataset,
                          EmojiDataset)
}


def get_dataset(data: DataConfig) -> Dataset:
    if data.dataset not in DATASETS:
        raise ConfigError(f"data.dataset={data.dataset!r}: expected one of {sorted(DATASETS)}")
    return DATASETS[data.dataset](data)
