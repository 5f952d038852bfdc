"""What goes in and out as files: images, RLE (the one normaliser), COCO instances and results (the one reader), proposals and the results writer. Imports core only."""
