"""Using a trained model: load it (`loaded`), turn a user's raw text, image or audio into a
model batch (`inputs`), embed a corpus into a Lance dataset (`embed_job`), search it
(`search`), classify (`classify`), caption (`caption`), serve it all over HTTP (`serve`).
"""
