"""The job's stages, in the order a document goes through them; each is a plain callable a test can run
without Ray, and job.py wires them into one Ray Data graph:

    read.py     ShardDatasource: one read task per shard -> rows (id, text, shard, row, error...)
    pack.py     tokenize_and_pack: rows -> packs, token-budget batches of documents laid back to back
    embed.py    EmbedStage: one model copy per actor, packs -> output rows (vectors, or dead letters)
    (io/sink.py CommittedParquetSink: output rows -> committed Parquet parts)

packs.py is the contract between the pack and embed stages; reports.py is what the stages tell the
driver while they run. Nothing here imports torch except embed.py, so read, pack and write workers
stay light.
"""
