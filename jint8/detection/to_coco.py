"""Writes a PASCAL VOC root as a COCO-format dataset: ``python -m jint8.detection.to_coco SRC DST``.

DST gets ``annotations/instances_<split>.json`` and each split's images in ``<split>/``, the layout that
``--config.dataset.format=coco`` reads by default. Classes, category ids (label + 1), image ids, boxes and image
bytes are the VOC reader's, so both formats prepare the same examples; the image names become file names.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import posixpath
import sys
from collections.abc import Sequence

from PIL import Image

from jint8.detection import annotations, source, voc


def write(data: annotations.Annotations, files: source.Files, destination: pathlib.Path) -> None:
  """Writes ``data`` (read from ``files``) under ``destination`` as COCO JSON per split and image folders."""
  categories = [{'id': i, 'name': n, 'supercategory': 'object'} for i, n in zip(data.category_ids, data.class_names)]
  (destination / 'annotations').mkdir(parents=True, exist_ok=True)
  for split, images in data.splits.items():
    content = {'info': {'description': f'{files.path}, split {split}, written by jint8.detection.to_coco'},
               'images': [], 'annotations': [], 'categories': categories}
    (destination / split).mkdir(exist_ok=True)
    for image in images:
      encoded = files.read(image.path)
      file_name = image.name + posixpath.splitext(image.path)[1]
      (destination / split / file_name).write_bytes(encoded)
      if image.size is None:
        with Image.open(io.BytesIO(encoded)) as opened:
          width, height = opened.size
      else:
        width, height = image.size
      content['images'].append({'id': image.image_id, 'file_name': file_name, 'width': width, 'height': height})
      for box, label in zip(image.boxes.tolist(), image.labels.tolist()):
        x0, y0, x1, y1 = box
        content['annotations'].append({
            'id': len(content['annotations']) + 1, 'image_id': image.image_id,
            'category_id': data.category_ids[label], 'bbox': [x0, y0, x1 - x0, y1 - y0],
            'area': (x1 - x0) * (y1 - y0), 'iscrowd': 0})
    (destination / 'annotations' / f'instances_{split}.json').write_text(json.dumps(content))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('source', help='a VOC root: a folder or a .tar.gz')
  parser.add_argument('destination', help='the COCO dataset folder to write (created)')
  parser.add_argument('--splits', default='train,val', help='comma-separated VOC splits (default: train,val)')
  parser.add_argument('--class_names', default='', help="comma-separated, in label order; '' takes the training "
                      "split's names, sorted")
  args = parser.parse_args(argv)
  try:
    files = source.Files(args.source)
    splits = [s for s in args.splits.split(',') if s]
    data = voc.read(files, splits, [c for c in args.class_names.split(',') if c])
    write(data, files, pathlib.Path(args.destination))
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{args.destination}: {", ".join(f"{s} {len(data.splits[s])} images" for s in splits)}, '
        f'classes {", ".join(data.class_names)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
