/** `@cape/sdk/node`: Node-only helpers (filesystem access). */
export { buildBundle, COMPRESS_LEVEL } from "./bundle.js";
export type { Bundle } from "./bundle.js";
