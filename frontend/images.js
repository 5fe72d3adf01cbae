// The original web server's image preprocessing, done in the browser before an image is sent:
// the process mode (Pad, Resize, Crop, Default), then the longest-side limit, then PNG base64.

export const PAD_COLOR = [122, 116, 104];
const RESIZE_SIDE = 336;
const MAX_LONGEST = 1344;
const MAX_SHORTEST = 672;

/** The size an image of `width`×`height` is sent at: unchanged unless its longest side exceeds
 * 1344, else the shortest side becomes int(min(1344 / aspect, 672, shortest)) and the longest
 * int(shortest × aspect), keeping the orientation (4000×3000 → 896×672). */
export function limitSize(width, height) {
  const longest = Math.max(width, height);
  const shortest = Math.min(width, height);
  if (longest <= MAX_LONGEST) return [width, height];
  const aspect = longest / shortest;
  const short = Math.trunc(Math.min(MAX_LONGEST / aspect, MAX_SHORTEST, shortest));
  const long = Math.trunc(short * aspect);
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
 * Returns a canvas. */
export function processedCanvas(source, mode) {
  let width = source.naturalWidth || source.width;
  let height = source.naturalHeight || source.height;
  let canvas;
  let context;
  if (mode === "Pad") {
    const side = Math.max(width, height);
    [canvas, context] = canvasOf(side, side);
    context.fillStyle = `rgb(${PAD_COLOR.join(", ")})`;
    context.fillRect(0, 0, side, side);
    context.drawImage(source, Math.trunc((side - width) / 2), Math.trunc((side - height) / 2));
  } else if (mode === "Resize") {
    [canvas, context] = canvasOf(RESIZE_SIDE, RESIZE_SIDE);
    context.drawImage(source, 0, 0, RESIZE_SIDE, RESIZE_SIDE);
  } else {
    // Crop and Default send the image unchanged; any crop happens in the worker's image processor.
    [canvas, context] = canvasOf(width, height);
    context.drawImage(source, 0, 0);
  }
  const [limitedWidth, limitedHeight] = limitSize(canvas.width, canvas.height);
  if (limitedWidth === canvas.width && limitedHeight === canvas.height) return canvas;
  const [smaller, smallerContext] = canvasOf(limitedWidth, limitedHeight);
  smallerContext.drawImage(canvas, 0, 0, limitedWidth, limitedHeight);
  return smaller;
}

/** The image as the worker receives it: `{base64, dataUrl, width, height}` of a PNG. */
export async function processImage(source, mode) {
  const canvas = processedCanvas(source, mode);
  const dataUrl = canvas.toDataURL("image/png");
  return { base64: dataUrl.slice(dataUrl.indexOf(",") + 1), dataUrl, width: canvas.width, height: canvas.height };
}

/** Decode an image file (or blob); rejects with a readable message when it is not an image. */
export async function readImage(file) {
  try {
    return await createImageBitmap(file);
  } catch {
    throw new Error(`${file.name || "this file"} is not an image the browser can read`);
  }
}
