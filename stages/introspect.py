"""introspect: look inside the trained model on the test split: t-SNE map, first-layer filters, top-k."""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep import portable
from photoprep.core import errors, params
from photoprep.core.layout import PATHS


def main() -> str:
    every = params.load()
    portable.pin_cpu_math(every.compute.cpu_math, every.compute.threads)  # before numpy and torch load
    from photoprep.core import io
    from photoprep.learn import checkpoint, embed, evaluate, introspect

    p = every.introspect
    model, meta = checkpoint.load_model(PATHS.model)
    test = evaluate.load_test(meta, PATHS)
    classes = list(meta["classes"])
    embeddings, probs = embed.forward(model, meta, test.inputs, p.batch_size)
    assert probs is not None  # a model file's classifier
    predicted = probs.argmax(1) if len(probs) else test.labels
    pixels = evaluate.split_pixels(test, PATHS)
    coords = introspect.tsne_map(embeddings, p.perplexity, p.seed)
    io.write_table(introspect.tsne_table(coords, test.labels, predicted, classes, test.table), PATHS.tsne_csv)
    introspect.draw_tsne(coords, test.labels, classes, pixels, p.thumbnails, PATHS.tsne_png)
    introspect.draw_filters(introspect.first_layer_filters(model, meta, p.filters), PATHS.filters_png)
    top = introspect.top_predictions(probs, test.labels, classes, test.table, p.per_class, p.top_k)
    io.write_table(top.drop(columns="row"), PATHS.top5_csv)
    introspect.draw_top(top, pixels, p.top_k, PATHS.top5_png)
    dims = embeddings.shape[1] if embeddings.ndim == 2 else 0
    return f"{len(test)} test images: t-SNE of {dims}-dim embeddings, {len(top)} top-{p.top_k} rows"


if __name__ == "__main__":
    errors.run_stage(main)
