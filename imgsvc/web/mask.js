// Painting a mask over an image: strokes in image pixels, undo, and the mask as a PNG of the
// image's size (white = repaint, black = keep), the form /v1/inpaint takes.

export class MaskPainter {
  constructor(canvas, image) {
    this.canvas = canvas;
    this.image = image;
    this.context = canvas.getContext("2d");
    this.strokes = []; // {width, points: [[x, y], ...]} in image pixels
    this.current = null;
    this.brush = 40; // on-screen pixels
    canvas.addEventListener("pointerdown", (event) => this.start(event));
    canvas.addEventListener("pointermove", (event) => this.move(event));
    canvas.addEventListener("pointerup", (event) => this.end(event));
    canvas.addEventListener("pointercancel", (event) => this.end(event));
  }

  setImage(url, width, height) {
    this.strokes = [];
    this.current = null;
    if (!url) {
      this.image.removeAttribute("src");
      return;
    }
    this.image.src = url;
    this.canvas.width = width || 1;
    this.canvas.height = height || 1;
    this.redraw();
  }

  isEmpty() {
    return this.strokes.length === 0;
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    const sx = this.canvas.width / box.width;
    const sy = this.canvas.height / box.height;
    return { x: (event.clientX - box.left) * sx, y: (event.clientY - box.top) * sy, scale: sx };
  }

  start(event) {
    if (event.button !== 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    const p = this.point(event);
    this.current = { width: Math.max(1, this.brush * p.scale), points: [[p.x, p.y]] };
    this.strokes.push(this.current);
    this.redraw();
  }

  move(event) {
    if (!this.current) return;
    const p = this.point(event);
    this.current.points.push([p.x, p.y]);
    this.redraw();
  }

  end(event) {
    if (!this.current) return;
    this.current = null;
    if (this.canvas.hasPointerCapture(event.pointerId)) {
      this.canvas.releasePointerCapture(event.pointerId);
    }
  }

  undo() {
    this.strokes.pop();
    this.redraw();
  }

  clear() {
    this.strokes = [];
    this.redraw();
  }

  draw(context, color) {
    context.strokeStyle = color;
    context.fillStyle = color;
    context.lineCap = "round";
    context.lineJoin = "round";
    for (const stroke of this.strokes) {
      const [first, ...rest] = stroke.points;
      context.lineWidth = stroke.width;
      if (!rest.length) {
        context.beginPath();
        context.arc(first[0], first[1], stroke.width / 2, 0, 2 * Math.PI);
        context.fill();
        continue;
      }
      context.beginPath();
      context.moveTo(first[0], first[1]);
      for (const [x, y] of rest) context.lineTo(x, y);
      context.stroke();
    }
  }

  /** The strokes on screen (opaque; the canvas itself is shown half-transparent). */
  redraw() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.draw(this.context, "#ff2d55");
  }

  /** The mask as a PNG Blob of the image's size. */
  maskBlob() {
    const mask = document.createElement("canvas");
    mask.width = this.canvas.width;
    mask.height = this.canvas.height;
    const context = mask.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, mask.width, mask.height);
    this.draw(context, "#fff");
    return new Promise((resolve) => mask.toBlob(resolve, "image/png"));
  }
}
