// The browser build swaps ./node.js for ./browser.js (scripts/build-browser.mjs).
export { openSocket } from "./node.js";
