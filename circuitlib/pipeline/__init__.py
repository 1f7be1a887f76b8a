"""One extraction end to end (`extraction`: load, extract, prune, measure, save, re-evaluate) and the
export of a saved run (`export`: ONNX)."""
