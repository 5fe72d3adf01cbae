// The original web server's image preprocessing, done in the browser before an image is sent:
// the process mode (Pad, Resize, Crop, Default), then the longest-side limit, then PNG base64.

export const PAD_COLOR = [122, 116, 104];
const RESIZE_SIDE = 336;
const MAX_LONGEST = 1344;
const MAX_SHORTEST = 672;

/** "1.5" for 1_500_000 pixels. */
const megapixels = (pixels) => (pixels / 1e6).toLocaleString("en", { maximumFractionDigits: 1 });

/** The size an image of `width`×`height` is sent at: unchanged unless its longest side exceeds
 * 1344, else the shortest side becomes int(min(1344 / aspect, 672, shortest)) and the longest
 * int(shortest × aspect), keeping the orientation (4000×3000 → 896×672). A side the original would make 0
 * (an image over 1344 times as long as it is wide) is 1, 3000×2 → 1344×1: an empty image was sent, which a
 * LLaVA model refuses. */
export function limitSize(width, height) {
  const longest = Math.max(width, height);
  const shortest = Math.min(width, height);
  if (longest <= MAX_LONGEST) return [width, height];
  const aspect = longest / shortest;
  const short = Math.max(1, Math.trunc(Math.min(MAX_LONGEST / aspect, MAX_SHORTEST, shortest)));
  const long = Math.min(MAX_LONGEST, Math.trunc(short * aspect));
  return height > width ? [short, long] : [long, short];
}

function canvasOf(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  // Opaque, as the original's RGB images are.
  const context = canvas.getContext("2d", { alpha: false });
  context.imageSmoothingQuality = "high";
  return [canvas, context];
}

/** Draw `source` (an ImageBitmap or a loaded <img>) as the original would send it with `mode`.
 * Returns a canvas. The longest-side limit is applied as the image is drawn: a full-size canvas of a large image
 * (padded to a square, at that) could be past what the browser draws at all. */
export function processedCanvas(source, mode) {
  const width = source.naturalWidth || source.width;
  const height = source.naturalHeight || source.height;
  let canvas;
  let context;
  if (mode === "Pad") {
    const side = Math.max(width, height);
    const [limited] = limitSize(side, side);
    const scale = limited / side;
    [canvas, context] = canvasOf(limited, limited);
    context.fillStyle = `rgb(${PAD_COLOR.join(", ")})`;
    context.fillRect(0, 0, limited, limited);
    context.drawImage(source, Math.trunc((side - width) / 2) * scale, Math.trunc((side - height) / 2) * scale,
                      width * scale, height * scale);
  } else if (mode === "Resize") {
    [canvas, context] = canvasOf(RESIZE_SIDE, RESIZE_SIDE);
    context.drawImage(source, 0, 0, RESIZE_SIDE, RESIZE_SIDE);
  } else {
    // Crop and Default send the image unchanged; any crop happens in the worker's image processor.
    const [limitedWidth, limitedHeight] = limitSize(width, height);
    [canvas, context] = canvasOf(limitedWidth, limitedHeight);
    context.drawImage(source, 0, 0, limitedWidth, limitedHeight);
  }
  return canvas;
}

/** The image as the worker receives it: `{base64, dataUrl, width, height}` of a PNG. */
export async function processImage(source, mode) {
  const canvas = processedCanvas(source, mode);
  const dataUrl = canvas.toDataURL("image/png");
  return { base64: dataUrl.slice(dataUrl.indexOf(",") + 1), dataUrl, width: canvas.width, height: canvas.height };
}

/** An image file loaded in an <img>: its width and height come from its header (its pixels are decoded only once it
 * is drawn). */
async function loadedImage(file) {
  const url = URL.createObjectURL(file);
  try {
    const img = new Image();
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = reject;
      img.src = url;
    });
    return img;
  } finally {
    URL.revokeObjectURL(url);
  }
}

/** Decode an image file (or blob); rejects with a readable message when it is not an image, or one with more pixels
 * than `maxPixels`, the API's limit (decoding it could freeze the tab or run it out of memory: 4 bytes a pixel). */
export async function readImage(file, maxPixels) {
  const name = file.name || "this file";
  const unreadable = new Error(`${name} is not an image the browser can read`);
  const img = await loadedImage(file).catch(() => { throw unreadable; });
  const [width, height] = [img.naturalWidth, img.naturalHeight];
  if (width * height > maxPixels) {
    throw new Error(`${name} is ${width}×${height} pixels (${megapixels(width * height)} megapixels): the page `
                    + `takes images of up to ${megapixels(maxPixels)} megapixels. Make it smaller and try again.`);
  }
  if (file.type === "image/svg+xml") {
    // createImageBitmap decodes no SVG file: it is drawn from its <img>, at the size it sets. One without a width
    // and height of its own (on its <svg>) has no size to be drawn at: it was refused as no image at all.
    try {
      return await createImageBitmap(img);
    } catch {
      throw new Error(`${name} is an SVG without a width and height: the browser draws an SVG at the size it sets. `
                      + "Give its <svg> element width and height attributes (or save it as a PNG) and try again.");
    }
  }
  try {
    return await createImageBitmap(file);
  } catch {
    throw unreadable;
  }
}
