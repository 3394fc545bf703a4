export { Cape, keyFromUserData } from "./cape.js";
export type { Account, Attested, CapeOptions, Deployed, FunctionInfo, FunctionRef, TokenInfo } from "./cape.js";
export * from "./errors.js";
export { CapeKey, encryptBinary, encryptStream, encryptText, seal, PREFIX, STREAM_PREFIX } from "./envelope.js";
export type { StreamSource } from "./envelope.js";
export { Root, verifyAttestation, verifyArchivedAttestation } from "./verify.js";
export type { PcrPins } from "./verify.js";
export { parseAttestation } from "./attestation.js";
