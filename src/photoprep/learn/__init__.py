"""learn: models on the dataset: data loading, training, evaluation, prediction, clustering."""
