"""Defenses against adversarial examples: a plain PyTorch + scikit-learn library.

Data loaders, models with named depths, activation streaming, streaming PCA, LESCI, and the
training loop. Nothing here imports Ray, Optuna, MLflow or boto3: ``orchestrator`` adapts this
library to distributed trials.
"""

from defenses.activations import ActivationBatch, stream_activations
from defenses.data import Augmentation, DatasetError, DatasetName, Splits, load_dataset
from defenses.embedding_space import EmbeddingSpace, build_embedding_space
from defenses.knn import KnnIndex, knn_vote
from defenses.lesci import evaluate_lesci, fit_pca_at_depth
from defenses.checkpoints import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from defenses.models import ModelName, build_model, depth_shapes
from defenses.pca import PCAError, StreamingPCA
from defenses.evaluation import accuracy
from defenses.trainer import TrainConfig, Trainer

__all__ = [
    "ActivationBatch", "stream_activations",
    "Augmentation", "DatasetError", "DatasetName", "Splits", "load_dataset",
    "EmbeddingSpace", "build_embedding_space", "evaluate_lesci", "KnnIndex",
    "fit_pca_at_depth", "knn_vote",
    "CheckpointError", "ModelName", "build_model", "depth_shapes", "load_checkpoint",
    "load_weights", "save_checkpoint",
    "PCAError", "StreamingPCA",
    "TrainConfig", "Trainer", "accuracy",
]
