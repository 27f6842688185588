"""The block layer: node graph, BlockBackends, drivers, dirty bitmaps."""
